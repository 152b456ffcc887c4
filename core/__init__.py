"""genq core: settings, database, schemas and the job service, shared by api and worker."""
