"""The one exception users see: a single line naming the bad field or file, exit code 2."""


class UserError(Exception):
  """Bad input from the user (config value, file, data). The CLI prints it and exits 2."""

  exit_code = 2
