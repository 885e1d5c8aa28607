from spot.cli import app

app()
