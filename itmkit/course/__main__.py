"""``python -m itmkit.course list | run ...``: the course runner's command line (:mod:`itmkit.course.runner`)."""

import sys

from itmkit.course.runner import main

sys.exit(main())
