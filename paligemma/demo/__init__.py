"""The demo: a tiny PaliGemma trained on synthetic shape scenes, shipped as an official `.npz`.

`scenes` draws the scenes and their ground truth; `command` is `paligemma demo`.
"""
