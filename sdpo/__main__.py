from sdpo.cli import entry

entry()
