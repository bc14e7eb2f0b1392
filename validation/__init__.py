"""validation: every solver against exact answers (the project's main job: ``python -m validation``)."""
