#!/usr/bin/python3
"""Ansible module: point every apt source entry for one repository URI at a keyring.

Runs on the node (inside the chroot for simulated nodes) with the node's python3.
Handles the one-line format (``/etc/apt/sources.list``, ``sources.list.d/*.list``) and
the deb822 format (``sources.list.d/*.sources``). Only entries whose URI equals ``uri``
(trailing slash ignored) are rewritten; every other line and file is left byte-for-byte
as it was. Idempotent: a file is written only when its content changes, atomically,
keeping its mode. Supports check mode and returns the previous content of each changed
file in ``backups`` so a caller can restore them.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: fleet_apt_signed_by
short_description: Set signed-by for the apt source entries of one repository
options:
  uri: {type: str, required: true, description: repository URI as written in the source entry}
  keyring: {type: path, required: true, description: keyring path to put in signed-by}
  apt_dir: {type: path, default: /etc/apt}
"""

_ONE_LINE = re.compile(r"^(?P<lead>\s*)(?P<type>deb|deb-src)(?P<sp>\s+)(?:\[(?P<opts>[^\]]*)\]\s+)?(?P<rest>\S.*)$")


def _norm(uri: str) -> str:
    return uri.rstrip("/")


def _rewrite_one_line(text: str, uri: str, keyring: str) -> tuple[str, int]:
    out: list[str] = []
    hits = 0
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        eol = line[len(body):]
        m = _ONE_LINE.match(body)
        if not m:
            out.append(line)
            continue
        rest = m.group("rest").split()
        if not rest or _norm(rest[0]) != _norm(uri):
            out.append(line)
            continue
        hits += 1
        opts = [o for o in (m.group("opts") or "").split() if o]
        opts = [o for o in opts if not o.lower().startswith("signed-by=")]
        opts.append(f"signed-by={keyring}")
        out.append(f"{m.group('lead')}{m.group('type')} [{' '.join(opts)}] {m.group('rest')}{eol}")
    return "".join(out), hits


def _rewrite_deb822(text: str, uri: str, keyring: str) -> tuple[str, int]:
    # Stanzas are separated by blank lines; fields may continue on lines starting with
    # whitespace (an inline Signed-By key block is such a field).
    lines = text.splitlines(keepends=True)
    stanzas: list[list[str]] = []
    cur: list[str] = []
    for line in lines:
        if line.strip() == "":
            if cur:
                stanzas.append(cur)
                cur = []
            stanzas.append([line])
        else:
            cur.append(line)
    if cur:
        stanzas.append(cur)
    hits = 0
    out: list[str] = []
    for st in stanzas:
        fields: list[tuple[str | None, list[str]]] = []  # (lower-case name or None for comments), lines
        for line in st:
            if line[:1] in (" ", "\t") and fields and fields[-1][0] is not None:
                fields[-1][1].append(line)
            elif line.lstrip().startswith("#") or ":" not in line:
                fields.append((None, [line]))
            else:
                fields.append((line.split(":", 1)[0].strip().lower(), [line]))
        uris_val = " ".join(
            "".join(ls).split(":", 1)[1] for name, ls in fields if name == "uris"
        ).split()
        enabled = [("".join(ls).split(":", 1)[1].strip().lower()) for name, ls in fields if name == "enabled"]
        if not any(_norm(u) == _norm(uri) for u in uris_val) or (enabled and enabled[0] == "no"):
            out.extend(st)
            continue
        hits += 1
        eol = "\n"
        new: list[str] = []
        placed = False
        for name, ls in fields:
            if name == "signed-by":
                if not placed:
                    new.append(f"Signed-By: {keyring}{eol}")
                    placed = True
                continue
            new.extend(ls)
        if not placed:
            # keep a trailing newline on the last field before appending ours
            if new and not new[-1].endswith("\n"):
                new[-1] += eol
            new.append(f"Signed-By: {keyring}{eol}")
        out.extend(new)
    return "".join(out), hits


def _write_atomic(path: str, content: str) -> None:
    st = os.stat(path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".fleet-")
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(content)
        os.chmod(tmp, st.st_mode & 0o7777)
        os.chown(tmp, st.st_uid, st.st_gid)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main() -> None:
    module = AnsibleModule(
        argument_spec={
            "uri": {"type": "str", "required": True},
            "keyring": {"type": "path", "required": True},
            "apt_dir": {"type": "path", "default": "/etc/apt"},
        },
        supports_check_mode=True,
    )
    uri = module.params["uri"]
    keyring = module.params["keyring"]
    apt_dir = module.params["apt_dir"]
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*://[A-Za-z0-9._~:/%+-]+", uri):
        module.fail_json(msg=f"refusing repository URI {uri!r}: unexpected characters")
    if not re.fullmatch(r"/[A-Za-z0-9._/-]+", keyring):
        module.fail_json(msg=f"refusing keyring path {keyring!r}: unexpected characters")
    candidates = [os.path.join(apt_dir, "sources.list")]
    candidates += sorted(glob.glob(os.path.join(apt_dir, "sources.list.d", "*.list")))
    candidates += sorted(glob.glob(os.path.join(apt_dir, "sources.list.d", "*.sources")))
    changed_files: list[str] = []
    matched_files: list[str] = []
    backups: dict[str, str] = {}
    for path in candidates:
        if not os.path.isfile(path):
            continue
        with open(path) as fh:
            old = fh.read()
        if path.endswith(".sources"):
            new, hits = _rewrite_deb822(old, uri, keyring)
        else:
            new, hits = _rewrite_one_line(old, uri, keyring)
        if hits:
            matched_files.append(path)
        if new != old:
            changed_files.append(path)
            backups[path] = old
            if not module.check_mode:
                _write_atomic(path, new)
    if not matched_files:
        module.fail_json(msg=f"no apt source entry for {uri} under {apt_dir}", matched_files=[])
    module.exit_json(changed=bool(changed_files), files=changed_files, matched_files=matched_files,
                     backups=backups)


if __name__ == "__main__":
    main()
