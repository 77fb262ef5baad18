"""Long recordings as jobs: durable job state (:mod:`service.jobs.store`) and the work on it."""
