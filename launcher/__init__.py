"""promptlaunch launcher: compose config -> validate -> plan job specs -> hand them to an executor.

Nothing in this package imports torch: planning and rendering must stay fast and runnable on a login node.
"""
