"""The fuzzing worker: mutate one repository object per case, run the commands in process, report.

Run by tests/fuzz/test_fuzz.py as `python -m tests.fuzz.worker` with a JSON request on stdin
({"pristine": DIR, "work": DIR, "passphrase": ..., "image_sha256": ..., "kind": ..., "seeds": [...]});
answers one JSON line per case. It runs in its own process with an address-space limit and an
alarm per command, so a mutation that makes the program allocate gigabytes or loop forever is
reported ("memory", "hang") instead of taking the test machine down.

Mutations are seeded (`random.Random(seed)`), so a failing case is replayed by its seed. Two
families per object kind:
* raw: bytes flipped, truncated, emptied, swapped with another object of the same kind;
* structural: the object decoded (JSON, or the envelope opened with the repository's keys),
  one field or byte range changed (wrong type, absurd number, missing key, huge string), and
  re-sealed so every checksum passes, as someone holding the keys (or anyone, for an
  unencrypted repository) could write it.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import sys
import traceback

KINDS = ("config", "keys", "manifest", "index", "lock", "chunk")
MEMORY_LIMIT = 3 << 30
COMMAND_SECONDS = 30

ABSURD = [None, True, -1, 0, 1, 7, 2**31, 2**62, 10**30, 1.5, float("inf"), "", "x" * 10_000, [], {}, [1, 2], {"a": 1}]


class Hang(Exception):
    pass


def _on_alarm(signum, frame):
    raise Hang()


def run_cli(args: list[str], env: dict) -> tuple[int | str, str]:
    """(exit code, or "traceback"/"hang"/"memory"; the output) of one in-process command."""
    from surepoint.cli import main

    saved_env, saved_argv = dict(os.environ), sys.argv
    os.environ.update(env)
    sys.argv = ["surepoint", *args]
    out = io.StringIO()
    code: int | str
    signal.alarm(COMMAND_SECONDS)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except Hang:
        code = "hang"
    except MemoryError:
        code = "memory"
        out.write(traceback.format_exc())
    except BaseException:  # noqa: BLE001 - the point: anything escaping main() is a traceback for the user
        code = "traceback"
        out.write(traceback.format_exc())
    finally:
        signal.alarm(0)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
    return code, out.getvalue()


# -- mutations ---------------------------------------------------------------------------------


def _mutate_json(rng: random.Random, value, depth: int = 0):
    """`value` with one thing changed somewhere inside it."""
    if isinstance(value, dict) and value and (depth == 0 or rng.random() < 0.7):
        key = rng.choice(sorted(value))
        choice = rng.random()
        changed = dict(value)
        if choice < 0.2:
            del changed[key]
        elif choice < 0.6 or not isinstance(value[key], dict | list):
            changed[key] = rng.choice(ABSURD)
        else:
            changed[key] = _mutate_json(rng, value[key], depth + 1)
        return changed
    if isinstance(value, list) and value:
        changed = list(value)
        i = rng.randrange(len(changed))
        changed[i] = _mutate_json(rng, changed[i], depth + 1) if rng.random() < 0.5 else rng.choice(ABSURD)
        return changed
    return rng.choice(ABSURD)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    data = bytearray(data)
    choice = rng.random()
    if not data or choice < 0.1:
        return b""
    if choice < 0.3:
        return bytes(data[: rng.randrange(len(data))])
    if choice < 0.4:
        return bytes(data) + rng.randbytes(rng.randrange(1, 64))
    for _ in range(rng.randint(1, 4)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def _objects(root: str, prefix: str) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(os.path.join(root, prefix)):
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in files if not f.endswith(".tmp")]
    return sorted(found)


def _envelope(root: str, passphrase: str):
    from surepoint.repo.repository import Repository
    from surepoint.storage.local import LocalBackend

    return Repository.open(LocalBackend(root), lambda: passphrase).envelope


def mutate(kind: str, seed: int, root: str, passphrase: str) -> str:
    """Change one object of `kind` in the repository at `root`; return what was done."""
    from surepoint.repo.envelope import KIND_CHUNK, KIND_INDEX, KIND_MANIFEST

    rng = random.Random(seed)
    structural = rng.random() < 0.6
    config_path = os.path.join(root, "config")
    if kind in ("config", "keys"):
        with open(config_path, "rb") as f:
            raw = f.read()
        if not structural:
            new = _mutate_bytes(rng, raw)
            what = "config bytes"
        else:
            config = json.loads(raw)
            if kind == "keys" and isinstance(config.get("encryption"), dict):
                config["encryption"] = _mutate_json(rng, config["encryption"], 1)
                what = "config.encryption field"
            else:
                config = _mutate_json(rng, config)
                what = "config field"
            new = json.dumps(config).encode()
        with open(config_path, "wb") as f:
            f.write(new)
        return what
    if kind == "lock":
        import socket
        import time

        record = {
            "id": "f" * 16,
            "kind": "backup",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created": time.time(),
            "refreshed": time.time(),
        }
        raw = json.dumps(record).encode()
        new = json.dumps(_mutate_json(rng, record)).encode() if structural else _mutate_bytes(rng, raw)
        os.makedirs(os.path.join(root, "locks"), exist_ok=True)
        with open(os.path.join(root, "locks", record["id"]), "wb") as f:
            f.write(new)
        return "lock field" if structural else "lock bytes"
    prefix, envelope_kind = {
        "manifest": ("restorepoints", KIND_MANIFEST),
        "index": ("indexes", KIND_INDEX),
        "chunk": ("chunks", KIND_CHUNK),
    }[kind]
    names = _objects(root, prefix)
    name = rng.choice(names)
    path = os.path.join(root, name)
    with open(path, "rb") as f:
        blob = f.read()
    if not structural:
        if len(names) > 1 and rng.random() < 0.2:
            other = rng.choice([n for n in names if n != name])
            with open(os.path.join(root, other), "rb") as f:
                new = f.read()
            what = f"{kind} {name} replaced by {other}"
        else:
            new = _mutate_bytes(rng, blob)
            what = f"{kind} {name} bytes"
    else:
        envelope = _envelope(root, passphrase)
        binding = os.path.basename(name) if kind == "chunk" else name  # a chunk is bound to its id
        plain = envelope.open(envelope_kind, binding, blob)
        if kind == "manifest":
            body = json.dumps(_mutate_json(rng, json.loads(plain))).encode()
        else:
            body = _mutate_bytes(rng, plain)
        new = envelope.seal(envelope_kind, binding, body)
        what = f"{kind} {name} re-sealed with a changed body"
    with open(path, "wb") as f:
        f.write(new)
    return what


# -- one case ----------------------------------------------------------------------------------


def run_case(request: dict, seed: int) -> dict:
    root = os.path.join(request["work"], f"case-{seed}")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(request["pristine"], os.path.join(root, "repo"))
    repo = os.path.join(root, "repo")
    what = mutate(request["kind"], seed, repo, request["passphrase"])
    env = {
        "SUREPOINT_REPO": repo,
        "SUREPOINT_PASSPHRASE": request["passphrase"],
        "SUREPOINT_CATALOG": os.path.join(root, "catalog.sqlite"),
        "SUREPOINT_KNOWN_REPOSITORIES": os.path.join(root, "known-repositories.json"),
    }
    result: dict = {"seed": seed, "mutation": what, "commands": {}}
    commands = [
        ("list", ["list", "--json"]),
        ("verify", ["verify"]),
        ("restore", ["restore", f"{request['name']}:latest", "--to", os.path.join(root, "restored.img")]),
    ]
    if request["kind"] in ("lock", "config"):
        commands.append(("gc", ["gc", "--dry-run"]))
    for label, args in commands:
        code, output = run_cli(args, env)
        entry = {"code": code, "output": output[-2000:]}
        if label == "restore":
            target = os.path.join(root, "restored.img")
            if os.path.exists(target):
                with open(target, "rb") as f:
                    entry["restored_sha256"] = hashlib.sha256(f.read()).hexdigest()
        result["commands"][label] = entry
    shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    request = json.loads(sys.stdin.read())
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    signal.signal(signal.SIGALRM, _on_alarm)
    for seed in request["seeds"]:
        try:
            answer = run_case(request, seed)
        except BaseException:  # noqa: BLE001 - a broken mutation is the harness's bug: say so
            answer = {"seed": seed, "harness_error": traceback.format_exc()}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
