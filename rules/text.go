package rules

import (
	"math"
	"strconv"
	"strings"
	"time"

	"github.com/culprit-dev/culprit/signals"
)

// The words of a finding are read by people: numbers in human units,
// nouns that agree with their count, no float noise ("4.8943905e+07",
// "0.06383225810000001 cores", "1 connections", "1 worker(s)"). Every rule
// formats numbers through these.

// count is n followed by the noun in the right number: "1 connection",
// "3 connections". plural may be "" for the regular English plural (+s).
func count(n float64, singular, plural string) string {
	if plural == "" {
		plural = singular + "s"
	}
	word := plural
	if n == 1 {
		word = singular
	}
	return num(n) + " " + word
}

// num formats a number for prose: integers as integers, small numbers with
// two or three significant digits (0.064), others with at most one decimal
// (148.7), from 1000 on none (1235); never in exponent form.
func num(x float64) string {
	switch {
	case math.IsNaN(x) || math.IsInf(x, 0):
		return "unknown"
	case x == math.Trunc(x) && math.Abs(x) < 1e15:
		return strconv.FormatInt(int64(x), 10)
	}
	a := math.Abs(x)
	prec := 0
	switch {
	case a < 0.01:
		prec = 4
	case a < 0.1:
		prec = 3
	case a < 1000:
		prec = 1
	}
	s := strconv.FormatFloat(x, 'f', prec, 64)
	if strings.Contains(s, ".") {
		s = strings.TrimRight(strings.TrimRight(s, "0"), ".")
	}
	return s
}

// rate is a rate in words: "3.2/s"; below 0.1/s it reads per minute,
// which is easier to picture: "4/min".
func rate(x float64) string {
	if x != 0 && math.Abs(x) < 0.1 {
		return num(x*60) + "/min"
	}
	return num(x) + "/s"
}

// cores is CPU use in words: "1.4 cores", "0.06 cores".
func cores(x float64) string {
	if x == 1 {
		return "1 core"
	}
	return num(x) + " cores"
}

// percent is a share 0..1 as "42%", "0.5%" when small.
func percent(share float64) string {
	p := 100 * share
	if p != 0 && math.Abs(p) < 1 {
		return num(p) + "%"
	}
	return strconv.FormatFloat(math.Round(p), 'f', 0, 64) + "%"
}

// duration is a time span for prose: "2.1 s", "350 ms", "4m30s".
func duration(d time.Duration) string {
	switch {
	case d >= time.Minute:
		return d.Round(time.Second).String()
	case d >= time.Second:
		return num(math.Round(d.Seconds()*10)/10) + " s"
	}
	return strconv.FormatInt(d.Round(time.Millisecond).Milliseconds(), 10) + " ms"
}

// rateIn is a counter's rate over the samples it has since from: its
// growth divided by the time those samples span, not by the whole window,
// so a series that began (or a fault that started) within the window is
// not diluted by the quiet before it. false when fewer than two samples.
func rateIn(st *signals.Store, d *signals.Desc, ls signals.Labels, from, now time.Time) (float64, bool) {
	ss := st.Range(d, ls, from)
	if len(ss) < 2 {
		return 0, false
	}
	// Producers write a counter only when it moves (and at least every
	// second while they poll): a last sample younger than that says the
	// value held until now, and the quiet since counts.
	end := ss[len(ss)-1].T
	if now.After(end) && now.Sub(end) <= heldFor {
		end = now
	}
	inc := 0.0
	for i := 1; i < len(ss); i++ {
		if d := ss[i].V - ss[i-1].V; d >= 0 {
			inc += d
		} else {
			inc += ss[i].V // a reset
		}
	}
	span := end.Sub(ss[0].T).Seconds()
	if span <= 0 {
		return 0, false
	}
	return inc / span, true
}

// heldFor is how long after its last sample a counter is taken to have
// held its value: producers rewrite an unchanged counter every second
// (probes' refreshEvery), so twice that.
const heldFor = 2 * time.Second
