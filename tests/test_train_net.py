"""d2_reclass.train_net: the train_net.py that pip installs (``d2-reclass-train``,
``python -m d2_reclass.train_net``), and tools/train_net.py, its wrapper in a checkout.

The training and evaluation it runs are tested end to end in test_trainer.py, through
tools/train_net.py.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_python_dash_m_is_train_net_with_its_flags():
    proc = subprocess.run([sys.executable, "-m", "d2_reclass.train_net", "--help"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = " ".join(proc.stdout.split())
    for flag in ["--config-file FILE", "--eval-only", "--resume", "--num-gpus NUM_GPUS",
                 "--coco-dataset NAME JSON IMAGE_ROOT", "register a COCO-format dataset"]:
        assert flag in text, flag


def test_tools_train_net_is_the_package_module():
    proc = subprocess.run(
        [sys.executable, "-c", "import sys\nsys.path.insert(0, 'tools')\nimport train_net\n"
         "import d2_reclass.train_net as m\n"
         "print(train_net.setup is m.setup, train_net.main is m.main, "
         "train_net.argument_parser is m.argument_parser)"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.stdout == "True True True\n", proc.stderr[-2000:]
