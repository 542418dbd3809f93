"""The prompted-model library under the stages (issue 18 moves it here piece by piece from stages/prompt_learning).

    template.py  NeMo-style task templates: parsing and checking ``<|VIRTUAL_PROMPT_n|>`` markers and fields
"""
