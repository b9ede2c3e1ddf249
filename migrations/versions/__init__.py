"""Date-prefixed revisions: YYYYMMDD_NNNN_slug.py."""
