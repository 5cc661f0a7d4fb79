"""One job per output: a lock file with its owner and a heartbeat (no Ray here).

Contract: ``OutputLock(fs, out).acquire()`` creates ``_skipray_lock.json`` under the output atomically
(local disks: ``O_CREAT | O_EXCL``; S3: one conditional ``PutObject`` with ``If-None-Match: *``, made with
boto3 because pyarrow's filesystem cannot make conditional writes). It holds the owner (a random
token, host, pid, start time) and a heartbeat time that a daemon thread refreshes every ``heartbeat_s``
seconds while the job runs. A second job finds the lock and is refused (``OutputError``, naming the
owner) while the heartbeat is younger than ``stale_s`` and, when the holder ran on the same host, its
process lives; otherwise the lock was left by a dead job and is taken over with a message.
A lock that is not JSON yet (its writer between create and write) is held, aged by its file's time; a
lock that cannot be read (network, permission) is never taken over (``OutputError``). ``release()`` stops
the heartbeat and removes the lock if it is still ours; ``check()`` raises once the heartbeat found
another job's lock in place of ours. Clocks: staleness compares the holder's clock with the reader's;
keep hosts within ``stale_s`` of each other (NTP). Taking over a stale lock (delete, then a conditional
create) is not atomic: two jobs that find the same stale lock in the same instant can both take it; the
one whose lock was replaced sees it at its next heartbeat and stops at its next ``check()``.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from skipray.batch.output import OutputError, write_text

LOCK = "_skipray_lock.json"


def _dead_here(held: dict) -> bool:
    """Whether the lock's holder ran on this host and its process is gone (a killed job: no need to wait)."""
    if held.get("host") != socket.gethostname() or not isinstance(held.get("pid"), int):
        return False
    try:
        os.kill(held["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


class OutputLock:
    """The output's lock (module contract)."""

    def __init__(
        self,
        fs,
        out: str,
        where: str | None = None,
        s3_endpoint: str | None = None,
        heartbeat_s: float = 10.0,
        stale_s: float = 120.0,
    ) -> None:
        from pyarrow import fs as pafs

        self.fs = fs or pafs.LocalFileSystem()
        self.path = f"{out.rstrip('/')}/{LOCK}"
        self.out, self.where = out, where or out
        self.s3_endpoint = s3_endpoint
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # the heartbeat found another job's lock in place of ours

    def _body(self) -> str:
        return json.dumps(
            {
                "owner": self.token,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started": self.started,
                "heartbeat": time.time(),
            }
        )

    @property
    def s3(self) -> bool:
        return self.fs.type_name != "local"

    def _create(self) -> bool:
        """Create the lock if none exists; -> whether this call created it."""
        body = self._body().encode()
        if not self.s3:
            self.fs.create_dir(self.out, recursive=True)
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            return True
        import boto3
        from botocore.exceptions import ClientError

        bucket, _, key = self.path.partition("/")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        client = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name=region)
        try:
            client.put_object(Bucket=bucket, Key=key, Body=body, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise
        return True

    def _read(self) -> dict | None:
        """The lock's contents; None when there is none. A lock that is not JSON (its writer between create
        and write, or cut short) counts as held, with its file's modification time as the heartbeat.
        Read errors (network, permission) raise: a lock that cannot be read is never taken over."""
        try:
            with self.fs.open_input_stream(self.path) as f:
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return None
        try:
            held = json.loads(text)
            if isinstance(held, dict):
                return held
        except ValueError:
            pass
        mtime = self.fs.get_file_info(self.path).mtime
        return {"owner": None, "host": "?", "pid": None, "heartbeat": mtime.timestamp() if mtime else time.time()}

    def acquire(self) -> None:
        """Take the lock or raise ``OutputError`` (module contract); starts the heartbeat."""
        try:
            if not self._create():
                held = self._read()
                age = time.time() - float((held or {}).get("heartbeat", 0))
                if held is not None and age < self.stale_s and not _dead_here(held):
                    raise OutputError(
                        f"another job is writing {self.where!r} (host {held.get('host')}, pid {held.get('pid')}, "
                        f"last heartbeat {age:.0f} s ago); wait for it to finish, or use another --output"
                    )
                if held is not None:
                    print(
                        f"[skipray] taking over the lock of a job that stopped (host {held.get('host')}, "
                        f"pid {held.get('pid')}, last heartbeat {age:.0f} s ago)",
                        file=sys.stderr,
                    )
                if held is not None:
                    self.fs.delete_file(self.path)
                if not self._create():
                    raise OutputError(f"another job took the lock of {self.where!r} just now; use another --output")
        except OutputError:
            raise
        except Exception as e:  # noqa: BLE001 - network, permission
            raise OutputError(f"cannot lock the output {self.where!r}: {e}") from e
        self._thread = threading.Thread(target=self._beat, name="skipray-output-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                held = self._read()
                if not held or held.get("owner") != self.token:
                    self.lost = True  # another job took it: execute stops before it touches the output again
                    print(f"[skipray] error: the lock of {self.where!r} is no longer this job's", file=sys.stderr)
                    return
                write_text(self.fs, self.path, self._body())
            except Exception as e:  # noqa: BLE001 - one missed heartbeat is not fatal
                print(f"[skipray] warning: lock heartbeat failed: {e}", file=sys.stderr)

    def check(self) -> None:
        """Raise ``OutputError`` when this job lost its lock (another job took it over meanwhile)."""
        if self.lost:
            raise OutputError(
                f"another job took over the lock of {self.where!r} while this one ran; the rows "
                "this job wrote are kept; re-run when the other job is done"
            )

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if this job still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            held = self._read()
            if held and held.get("owner") == self.token:
                self.fs.delete_file(self.path)
        except Exception as e:  # noqa: BLE001
            print(f"[skipray] warning: could not remove the lock {self.path}: {e}", file=sys.stderr)

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
