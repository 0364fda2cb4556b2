package rules

import "time"

// Record appends an event; the engine and tests use it.
func (j *Journal) Record(typ EventType, f Finding, t time.Time) Event { return j.append(typ, f, t) }
