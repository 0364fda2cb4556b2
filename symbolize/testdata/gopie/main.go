// Command gopie is a target for the symbolize tests, built with
// -buildmode=pie: it prints the address of one of its functions and waits.
package main

import (
	"fmt"
	"os"
	"reflect"
	"time"
)

//go:noinline
func culpritPIEWork(n int) int {
	s := 0
	for i := range n {
		s += i
	}
	return s
}

func main() {
	fmt.Printf("%#x\n", reflect.ValueOf(culpritPIEWork).Pointer())
	if len(os.Args) > 5 {
		fmt.Println(culpritPIEWork(len(os.Args)))
	}
	time.Sleep(time.Hour)
}
