"""Programs that run inside jobs, one folder per stage (same name as in ``stages:`` and ``conf/``)."""
