"""The built-in plugins: registered through the toolkit.plugins entry points, like any third party."""
