# The C++ extension only; all metadata lives in pyproject.toml. No libtorch, no CUDA: builds in seconds.
import os

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import setup

ext = Pybind11Extension(
    "xtoken_ext._C",
    sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".cpp")),
    include_dirs=["csrc"],
    depends=sorted(os.path.join("csrc", f) for f in os.listdir("csrc") if f.endswith(".hpp")),  # rebuild on header edits
    cxx_std=17,
    extra_compile_args=["-O3", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
)

setup(ext_modules=[ext], cmdclass={"build_ext": build_ext})
