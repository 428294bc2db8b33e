from moecompress.cli import app

if __name__ == "__main__":  # pragma: no cover  (python -m moecompress.cli)
    app()
