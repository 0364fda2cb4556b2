package rules

import (
	"math"
	"testing"
	"time"
)

func TestTextHelpers(t *testing.T) {
	for _, tc := range []struct{ got, want string }{
		{count(1, "connection", ""), "1 connection"},
		{count(2, "connection", ""), "2 connections"},
		{count(0, "worker", ""), "0 workers"},
		{count(1, "process", "processes"), "1 process"},
		{num(4.8943905e+07), "48943905"},
		{num(0.06383225810000001), "0.064"},
		{num(148.7), "148.7"},
		{num(1234.5678), "1235"},
		{num(math.NaN()), "unknown"},
		{rate(0.05), "3/min"},
		{rate(3.25), "3.2/s"},
		{cores(1.4), "1.4 cores"},
		{cores(1), "1 core"},
		{percent(0.983), "98%"},
		{percent(0.004), "0.4%"},
		{duration(2100 * time.Millisecond), "2.1 s"},
		{duration(350 * time.Millisecond), "350 ms"},
		{duration(270 * time.Second), "4m30s"},
	} {
		if tc.got != tc.want {
			t.Errorf("got %q, want %q", tc.got, tc.want)
		}
	}
}
