"""Admission: a trigger event becomes a run request, or an error result with the reason.

:mod:`.chain` names the parts (admission, rejection, stage); one module per
policy (:mod:`.decode`, :mod:`.hook`, :mod:`.dedup`, :mod:`.overlap`,
:mod:`.perkey`); :mod:`.dispatcher` owns the chain and the runs it starts.
"""
