"""The choices every front end offers (CLI, add-on, API).  Standard library only, so the add-on can build
its menus before its dependencies are installed."""

TEXTURE_SIZES = (256, 512, 1024, 2048)  # the texture sizes offered (pixels per side)
