"""Admission: a trigger event becomes a run request, or an error result with the reason."""
