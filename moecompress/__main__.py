from moecompress.cli import app

app(prog_name="moecompress")
