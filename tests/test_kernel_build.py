"""The one build step of the C kernels: a private cache, hash-checked loads, checked struct layouts."""

from __future__ import annotations

import ctypes
import os
import stat

import pytest

from attrsparse.core.errors import UserError
from attrsparse.deploy.kernels import build
from attrsparse.deploy.kernels.gather import Plan


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRSPARSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(build, "_LOADED", {})
    return tmp_path / "cache" / "kernels"


def test_cache_folder_is_private_and_the_library_is_recorded(fresh_cache):
    lib = build.load_library("gather")
    assert stat.S_IMODE(os.stat(fresh_cache).st_mode) == 0o700
    path, _, _ = build.library_path("gather")
    assert path.parent == fresh_cache and path.exists()
    assert (path.parent / (path.name + ".sha256")).read_text().strip() == build._sha256(path)
    build.check_layout(lib, Plan)  # the ctypes mirror matches gather.c's Plan


def test_a_changed_library_is_rebuilt_not_loaded(fresh_cache):
    build.load_library("gather")
    path, _, _ = build.library_path("gather")
    original = path.read_bytes()
    tampered = path.with_name(path.name + ".tampered")  # a new file: the loaded one stays mapped intact
    tampered.write_bytes(original[:-16] + b"\0" * 16)  # (rewriting it in place crashed pytest at exit)
    os.replace(tampered, path)  # tampered after the build
    assert not build._verified(path)
    build._LOADED.clear()
    build.load_library("gather")
    assert path.read_bytes() == original or build._verified(path)


def test_a_folder_writable_by_others_is_refused(fresh_cache):
    fresh_cache.mkdir(parents=True)
    os.chmod(fresh_cache, 0o777)
    with pytest.raises(UserError, match="writable by other users"):
        build.load_library("gather")


def test_a_library_writable_by_others_is_refused(fresh_cache):
    build.load_library("gather")
    path, _, _ = build.library_path("gather")
    os.chmod(path, 0o777)
    build._LOADED.clear()
    with pytest.raises(UserError, match="writable by other users"):
        build.load_library("gather")


def test_a_wrong_ctypes_mirror_is_caught(fresh_cache):
    lib = build.load_library("gather")

    class Plan(ctypes.Structure):  # noqa: D101  (the same name, one field short)
        _fields_ = [(n, ctypes.c_void_p) for n in ("w1", "b1", "w2t")]

    with pytest.raises(build.KernelBuildError, match="does not match the C header"):
        build.check_layout(lib, Plan)
