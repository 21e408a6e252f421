"""The backup server: job definitions and schedules, sessions run as child `surepoint` processes,
notifications, metrics, a REST API and a web console, in one long-running process.

Layers, top to bottom: app (wires everything) -> api / console -> scheduler -> executor ->
db, auth, notify. The server never runs a backup in its own process: every session is a child
`surepoint ... --json` process whose stderr lines are the session log, so a crash of a backup
cannot take the server down, and cancelling a session is a signal to its process group.
"""
