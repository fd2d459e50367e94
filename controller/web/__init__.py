"""The browser panel of `hotlab web` (docs/web.md)."""
