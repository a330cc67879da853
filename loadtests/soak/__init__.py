"""The soak harness: hours of traffic in minutes, with adapter churn, a crash and checks.

    python -m loadtests.soak.run --duration 600 --users 8     # or: make soak DURATION=600 USERS=8

run.py starts the real server, picks test adapters whose greedy answers part from each
other's at the first token and calibrates them, runs locust (locustfile.py) against it,
some of it through an A/B split with feedback, while a churn thread registers, replaces and
deletes adapters (the split's arms among them), ingests and deletes documents, trains and
tries admin calls with a scoped key, SIGKILLs the server once mid-run and restarts it on
the same data dir, and afterwards checks every answer (ledger.py judges which weights wrote
it), the split's counts and every acknowledged write; report.py writes the CSV and HTML
report. The request bodies and SSE parsing are loadtests/_requests.py's, shared with the
load test's locustfile.
"""
