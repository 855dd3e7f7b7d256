from .cli import command

if __name__ == "__main__":
    command(prog_name="python -m batcher.emulator")
