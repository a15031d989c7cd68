"""The column names of fedlora's datasets.

``text`` and ``label`` (a ``ClassLabel``) for classification and plain causal LM; ``instruction``,
``response`` and an optional ``input`` for instruction tuning, which may keep a ``label`` too, so
that the label partitioners can split it.
"""

TEXT, LABEL = "text", "label"
INSTRUCTION, INPUT, RESPONSE = "instruction", "input", "response"
