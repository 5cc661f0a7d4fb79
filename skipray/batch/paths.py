"""Paths of the file job: globs, overlap of input and output, and where a path lives (pure; no Ray).

Contract:

* ``glob_match(pattern, path)`` is Python's ``glob(recursive=True)`` on '/'-separated paths: ``*``,
  ``?`` and ``[...]`` stay within one path segment, a ``**`` segment matches any number of segments,
  none included. Names starting with ``.`` or ``_`` are never matched (the job skips them, as Ray Data
  and Spark do: ``_SUCCESS``, ``.crc``, the job's own ``_skipray_*`` files).
* ``overlap(input, output)`` says why an input and an output may not be used together (one equal to or
  an ancestor of the other, compared per path segment; links resolved for local paths; bucket and key
  on S3; an input glob that would match the output's files), or None.
* ``split_scheme(path)`` separates Ray's ``local://`` form (files on the driver's node) from the path.
"""

from __future__ import annotations

import fnmatch
import os

LOCAL_SCHEME = "local://"
MAGIC = "*?["


def has_magic(path: str) -> bool:
    """Whether ``path`` is a glob."""
    return any(ch in path for ch in MAGIC)


def split_scheme(path: str) -> tuple[bool, str]:
    """-> (whether the path had Ray's ``local://`` prefix, the path without it)."""
    if path.startswith(LOCAL_SCHEME):
        return True, path[len(LOCAL_SCHEME) :]
    return False, path


def glob_base(pattern: str) -> str:
    """The longest leading run of whole segments of ``pattern`` without glob characters ('/' at least)."""
    segs = pattern.split("/")
    fixed = []
    for s in segs[:-1]:
        if has_magic(s):
            break
        fixed.append(s)
    return "/".join(fixed) or "/"


def _match_segments(pat: list[str], parts: list[str]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match_segments(pat[1:], parts[i:]) for i in range(len(parts) + 1))
    if not parts:
        return False
    return fnmatch.fnmatchcase(parts[0], pat[0]) and _match_segments(pat[1:], parts[1:])


def glob_match(pattern: str, path: str) -> bool:
    """True when ``path`` matches ``pattern`` as ``glob.glob(pattern, recursive=True)`` would list it,
    hidden (``.``) and ``_`` names excluded below the pattern's fixed base (module contract)."""
    base = glob_base(pattern)
    if not (path == base or path.startswith(base.rstrip("/") + "/")):
        return False
    rest_pat = pattern[len(base) :].strip("/").split("/")
    rest = path[len(base) :].strip("/").split("/")
    if any(p.startswith((".", "_")) for p in rest):
        return False
    return _match_segments(rest_pat, rest)


def _segments(path: str, local: bool) -> list[str]:
    if local:
        path = os.path.realpath(os.path.expanduser(path))
    return [s for s in path.split("/") if s]


def _is_prefix(a: list[str], b: list[str]) -> bool:
    return len(a) <= len(b) and b[: len(a)] == a


def overlap(input_path: str, output_path: str, probe_name: str = "skipray-probe.parquet") -> str | None:
    """Why ``input_path`` and ``output_path`` (both local, or both ``s3://``) overlap, or None.

    An input glob overlaps the output when it would match a file the job writes there (``probe_name``);
    otherwise paths overlap when one is equal to or an ancestor of the other, segment by segment."""
    in_s3, out_s3 = input_path.startswith("s3://"), output_path.startswith("s3://")
    if in_s3 != out_s3:
        return None
    if in_s3:
        inp, out = input_path[len("s3://") :].rstrip("/"), output_path[len("s3://") :].rstrip("/")
    else:  # absolute first: a relative glob's fixed base would otherwise read as the root
        inp, out = (
            os.path.abspath(os.path.expanduser(path)) for _, path in map(split_scheme, (input_path, output_path))
        )
    out_segs = _segments(out, not in_s3)
    if has_magic(inp):
        base_segs = _segments(glob_base(inp), not in_s3)
        if _is_prefix(out_segs, base_segs):
            return f"the output {output_path!r} contains the input glob's directory"
        if _is_prefix(base_segs, out_segs):
            rest = "/".join([*out_segs[len(base_segs) :], probe_name])
            pattern = "/".join(["", *base_segs, inp[len(glob_base(inp)) :].strip("/")])
            if glob_match(pattern, "/" + "/".join(base_segs) + "/" + rest):
                return f"the input glob {input_path!r} would match the job's files in {output_path!r}"
        return None
    in_segs = _segments(inp, not in_s3)
    if in_segs == out_segs:
        return "the input and the output are the same path"
    if _is_prefix(out_segs, in_segs):
        return f"the output {output_path!r} contains the input"
    if _is_prefix(in_segs, out_segs):
        return f"the input {input_path!r} contains the output"
    return None
