"""Process-wide settings of a Triton Python stub, applied by every built model.py before its model's
code is imported. Only stubs import this module: never the build or a test process, which may need
what it switches off.

openvino's package __init__ imports its model-conversion API (openvino.tools.ovc, with its telemetry)
whenever it can: ~60 ms of each stub's `import openvino` (0.10 -> 0.04 s; openvino_genai 0.12 -> 0.06 s,
measured on a 2-core AVX2 host), paid on every cold start by the encoder and LLM engine stubs, for a
function no stub calls. Marked absent here, openvino skips it (its __init__ catches the ImportError).
"""

import sys

sys.modules.setdefault("openvino.tools.ovc", None)
