"""Packaging for d2_reclass, a detectron2 extension for changing a model's class set."""
from setuptools import find_packages, setup

setup(
    name="d2_reclass",
    version="0.1.0",
    description="Class-aware checkpoint surgery for detectron2: map or reinitialise every "
    "class-dependent head tensor when the class set changes.",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.8",
    packages=find_packages(include=["d2_reclass", "d2_reclass.*"]),
    # detectron2 is deliberately not listed: users install it from source for their CUDA build
    # (it is not on PyPI under its own name); everything else it needs comes with it.
    install_requires=["torch", "fvcore", "iopath", "tabulate", "tqdm", "numpy"],
    # d2-reclass-train: tools/train_net.py for pip users, who get no tools/ directory.
    entry_points={"console_scripts": ["d2-reclass = d2_reclass.cli:main",
                                      "d2-reclass-train = d2_reclass.train_net:command_line"]},
)
