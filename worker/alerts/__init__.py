"""Alerts: what went wrong (events), said in each webhook's format, sent at most once per event.

- `targets`: RECON_ALERT_WEBHOOKS parsed (a leaf module: settings import it).
- `events`: the events and their texts, built from rows of the database.
- `formats`: one event as the JSON body of each webhook format.
- `delivery`: one HTTP POST, its answer judged, no URL in any error.
- `service`: record an event once (Postgres dedupe key), deliver it, the periodic checks.
"""
