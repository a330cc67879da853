"""The soak harness: hours of traffic in minutes, with adapter churn, a crash and checks.

    python -m loadtests.soak.run --duration 600 --users 8     # or: make soak DURATION=600 USERS=8

run.py starts the real server, calibrates each test adapter's greedy answer, runs locust
(locustfile.py) against it while a churn thread registers, replaces and deletes adapters,
ingests and deletes documents, trains, sends feedback and tries admin calls with a scoped
key, SIGKILLs the server once mid-run and restarts it on the same data dir, and afterwards
checks every answer (ledger.py) and every acknowledged write; report.py writes the CSV and
HTML report.
"""
