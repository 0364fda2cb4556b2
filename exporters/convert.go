package exporters

import (
	"time"

	culpritv1 "github.com/culprit-dev/culprit/proto/culprit/v1"
	"github.com/culprit-dev/culprit/rules"
	"github.com/culprit-dev/culprit/signals"
	"github.com/culprit-dev/culprit/workload"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// timestamp leaves unset times unset, so a client can tell "never" from
// the Unix epoch.
func timestamp(t time.Time) *timestamppb.Timestamp {
	if t.IsZero() {
		return nil
	}
	return timestamppb.New(t)
}

// SeverityToProto maps a rule severity onto the API's enum; severities the
// API does not know become UNSPECIFIED rather than a made-up value.
func SeverityToProto(s rules.Severity) culpritv1.Severity {
	switch s {
	case rules.SeverityInfo:
		return culpritv1.Severity_SEVERITY_INFO
	case rules.SeverityWarning:
		return culpritv1.Severity_SEVERITY_WARNING
	case rules.SeverityCritical:
		return culpritv1.Severity_SEVERITY_CRITICAL
	}
	return culpritv1.Severity_SEVERITY_UNSPECIFIED
}

// severityFromProto reports false for values outside the enum, which a
// newer client could send.
func severityFromProto(s culpritv1.Severity) (rules.Severity, bool) {
	switch s {
	case culpritv1.Severity_SEVERITY_UNSPECIFIED:
		return 0, true
	case culpritv1.Severity_SEVERITY_INFO:
		return rules.SeverityInfo, true
	case culpritv1.Severity_SEVERITY_WARNING:
		return rules.SeverityWarning, true
	case culpritv1.Severity_SEVERITY_CRITICAL:
		return rules.SeverityCritical, true
	}
	return 0, false
}

func stateToProto(s rules.State) culpritv1.FindingState {
	switch s {
	case rules.StateOpen:
		return culpritv1.FindingState_FINDING_STATE_OPEN
	case rules.StateResolved:
		return culpritv1.FindingState_FINDING_STATE_RESOLVED
	}
	return culpritv1.FindingState_FINDING_STATE_UNSPECIFIED
}

func eventTypeToProto(t rules.EventType) culpritv1.FindingEvent_Type {
	switch t {
	case rules.EventOpened:
		return culpritv1.FindingEvent_TYPE_OPENED
	case rules.EventUpdated:
		return culpritv1.FindingEvent_TYPE_UPDATED
	case rules.EventResolved:
		return culpritv1.FindingEvent_TYPE_RESOLVED
	}
	return culpritv1.FindingEvent_TYPE_UNSPECIFIED
}

// FindingToProto converts a finding for the API.
func FindingToProto(f rules.Finding) *culpritv1.Finding {
	out := &culpritv1.Finding{
		Id:          f.ID,
		Rule:        f.Rule,
		Key:         f.Key,
		Title:       f.Title,
		Severity:    SeverityToProto(f.Severity),
		Confidence:  f.Confidence,
		State:       stateToProto(f.State),
		FirstSeen:   timestamp(f.FirstSeen),
		LastSeen:    timestamp(f.LastSeen),
		Resolved:    timestamp(f.Resolved),
		Symptom:     f.Symptom,
		Cause:       f.Cause,
		RootCause:   f.RootCause,
		Remediation: f.Remediation,
		Sequence:    f.Sequence,
	}
	for _, e := range f.Evidence {
		pe := &culpritv1.Evidence{Signal: e.Signal, Value: e.Value, Threshold: e.Threshold, Unit: e.Unit, Note: e.Note}
		if e.Window != 0 {
			pe.Window = durationpb.New(e.Window)
		}
		out.Evidence = append(out.Evidence, pe)
	}
	for _, a := range f.Artifacts {
		out.Artifacts = append(out.Artifacts, &culpritv1.Artifact{Kind: a.Kind, Value: a.Value, Detail: a.Detail})
	}
	if len(f.Labels) > 0 {
		out.Labels = make(map[string]string, len(f.Labels))
		for k, v := range f.Labels {
			out.Labels[k] = v
		}
	}
	return out
}

// EventToProto converts a journal event for the API.
func EventToProto(ev rules.Event) *culpritv1.FindingEvent {
	return &culpritv1.FindingEvent{
		Type:     eventTypeToProto(ev.Type),
		Sequence: ev.Sequence,
		Time:     timestamp(ev.Time),
		Finding:  FindingToProto(ev.Finding),
	}
}

// SignalToProto converts the newest value of one series for the API.
func SignalToProto(c signals.Current) *culpritv1.Signal {
	out := &culpritv1.Signal{Value: c.Sample.V, Time: timestamp(c.Sample.T)}
	if c.Desc != nil {
		out.Name, out.Kind, out.Help = c.Desc.Name, c.Desc.Kind.String(), c.Desc.Help
	}
	for _, l := range c.Labels {
		out.Labels = append(out.Labels, &culpritv1.Label{Name: l.Name, Value: l.Value})
	}
	return out
}

// StatusToProto converts a collector's or probe's status for the API.
func StatusToProto(s signals.Status) *culpritv1.ComponentStatus {
	return &culpritv1.ComponentStatus{
		Name:   s.Component,
		Kind:   s.Kind,
		State:  s.State,
		Detail: s.Detail,
		Lost:   append([]string(nil), s.Lost...),
		Since:  timestamp(s.Since),
	}
}

// targetToProto describes the tracker's target; the process fields stay
// empty while it is not found, because Tracker keeps the last process it
// lost and showing that PID would point at a process that is gone. The
// reason says why instead.
func targetToProto(t *workload.Tracker) *culpritv1.Target {
	if t == nil {
		return nil
	}
	out := &culpritv1.Target{Selector: t.Selector().String()}
	if p, ok := t.Current(); ok {
		out.Found = true
		out.Pid = int32(p.PID)
		out.Comm = p.Comm
		out.Cmdline = p.Cmdline
		out.NetnsInode = p.NetnsIno
	} else {
		out.Reason = t.Reason()
	}
	return out
}
