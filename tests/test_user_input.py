"""Files users hand to fgvr (manifests, lists, metadata, rules, run folders): read right or refused in one
line of an fgvr error family, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from fgvr.collection import list_source
from fgvr.data import read_dataset
from fgvr.errors import InputError


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path)
    return path


def test_a_latin1_manifest_is_one_data_error_naming_file_offset_and_fix(tmp_path):
    _img(tmp_path / "café" / "a.png")
    csv = tmp_path / "list.csv"
    csv.write_bytes("path,label\ncafé/a.png,cat\n".encode("latin-1"))
    with pytest.raises(InputError) as e:
        read_dataset(csv)
    msg = str(e.value)
    assert "\n" not in msg and str(csv) in msg and "UTF-8" in msg
    assert "byte 14" in msg  # 'path,label\ncaf' is 14 bytes, then 0xe9


def test_a_latin1_list_for_classify_is_one_data_error(tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_bytes("path\ncafé/a.png\n".encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        list_source(csv)


class _TokenCluster:
    """What `ray` does against a `ray start` cluster with token auth, from a client without a token: its C++
    core prints retries to file descriptor 2, then ray.init raises ConnectionError."""

    @staticmethod
    def is_initialized() -> bool:
        return False

    @staticmethod
    def init(**kw):
        import os

        for _ in range(20):
            os.write(2, b"gcs_client.cc:210: Failed to get cluster ID from GCS server: Unauthenticated: RPC error: "
                        b"InvalidAuthToken: Authentication token is missing or incorrect\n")
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")


def test_ray_token_cluster_is_one_line_with_the_auth_hint(monkeypatch, capfd):
    from fgvr import ray_run

    monkeypatch.setattr(ray_run, "require_ray", lambda: _TokenCluster)
    with pytest.raises(ray_run.RayError) as e:
        ray_run.connect("127.0.0.1:6379")
    msg = str(e.value)
    assert "\n" not in msg and "RAY_AUTH_MODE=token" in msg and "--ray auto" in msg
    assert "InvalidAuthToken" not in capfd.readouterr().err  # Ray's twenty lines are not shown
