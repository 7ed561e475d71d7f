"""surgery's built-in plugins (installed as the `surgery_plugins` package): each module is a plain plugin of
`@surgery.hookimpl` functions, registered through the `surgery` entry-point group like any third-party one."""
