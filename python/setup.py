"""Builds libAttentionKitC.so with SwiftPM (release) from the repository this folder sits in and
ships it inside the package, so `pip install ./python` is the whole installation. Needs a Swift
toolchain on PATH (or ATTENTIONKIT_SWIFT) and the system packages of scripts/install-deps."""

import os
import pathlib
import shutil
import subprocess
import sys

from setuptools import Distribution, setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent.parent


class BuildWithSwift(build_py):
    def run(self) -> None:
        super().run()
        if not (ROOT / "Package.swift").is_file():
            raise RuntimeError(f"attentionkit: {ROOT} is not the AttentionKit repository (no Package.swift)")
        swift = os.environ.get("ATTENTIONKIT_SWIFT") or shutil.which("swift") or "/opt/swift/usr/bin/swift"
        subprocess.run([swift, "build", "-c", "release", "--product", "AttentionKitC"], cwd=ROOT, check=True)
        name = "libAttentionKitC.dylib" if sys.platform == "darwin" else "libAttentionKitC.so"
        built = ROOT / ".build" / "release" / name
        target = pathlib.Path(self.build_lib) / "attentionkit" / "_lib"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target / built.name)


class BinaryDistribution(Distribution):
    """The wheel carries a native library: tag it for this platform."""

    def has_ext_modules(self) -> bool:
        return True


setup(cmdclass={"build_py": BuildWithSwift}, distclass=BinaryDistribution)
