"""The built-in plugins of dicomgate. Each module here is one plugin, found through the
``dicomgate`` entry-point group like any third-party plugin; the core never imports them."""
