"""patch-vllm: the stock argument parser accepts kvquant dtypes without any plugin loaded."""

import os
import subprocess
import sys

from kvquant_vllm.cli import main
from kvquant_vllm.patching import patch_vllm

PARSE = (
    "from vllm.engine.arg_utils import EngineArgs\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = EngineArgs.add_cli_args(FlexibleArgumentParser())\n"
    "print(parser.parse_args(['--kv-cache-dtype', 'kvquant3']).kv_cache_dtype)\n"
)


def _parse_without_plugins() -> subprocess.CompletedProcess:
    env = os.environ | {"VLLM_PLUGINS": ""}  # an empty allow-list loads no plugin
    return subprocess.run([sys.executable, "-c", PARSE], capture_output=True, text=True, env=env, timeout=300)


def test_patch_apply_check_revert_round_trip(capsys):
    patch_vllm("apply")
    assert main(["patch-vllm", "--check"]) == 0
    assert _parse_without_plugins().stdout.strip() == "kvquant3"
    try:
        assert all("reverted" in line for line in patch_vllm("revert"))
        assert all("already reverted" in line for line in patch_vllm("revert"))
        try:
            main(["patch-vllm", "--check"])
        except SystemExit as e:
            assert e.code == 1
        result = _parse_without_plugins()
        assert result.returncode != 0 and "invalid choice: 'kvquant3'" in result.stderr
    finally:
        assert main(["patch-vllm"]) == 0
    assert "already applied" in patch_vllm("apply")[0]
