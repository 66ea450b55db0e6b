"""Training recipes, one file per published recipe plus small demos; see ``train.recipe``.

Each module's docstring starts with a one-line summary and holds the command that runs it;
``get_config(arg=None)`` returns the :class:`train.recipe.Recipe`.
"""
