"""Stage 4, the teacher: where p^T comes from. One interface (:class:`mft_plugin.teacher.sources.Teacher`)
for the frozen copy, the shared base and the cache; the views the loss reads in :mod:`.views`."""
