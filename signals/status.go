package signals

// Running reports whether the named collector or probe is running now (its
// last status). Rules ask it to tell "the probe saw nothing" from "the
// probe is not there": an accept count of zero means something only when
// the probe that counts accepts runs.
func (s *Store) Running(component string) bool {
	s.mu.RLock()
	defer s.mu.RUnlock()
	st, ok := s.status[component]
	return ok && st.State == StateRunning
}
