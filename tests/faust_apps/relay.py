"""A minimal Faust app for the foundation test: moves records from one topic to another and counts them
in a table (so the worker must create its changelog topic)."""

import os

import faust

app = faust.App(
    os.environ["RELAY_APP_ID"],
    broker=f"kafka://{os.environ['RELAY_BROKER']}",
    store="memory://",
    datadir=os.environ["RELAY_DATADIR"],
    topic_partitions=2,
    topic_replication_factor=1,
    web_enabled=False,
)
source = app.topic(os.environ["RELAY_SOURCE"], value_serializer="raw", key_serializer="raw")
target = app.topic(os.environ["RELAY_TARGET"], value_serializer="raw", key_serializer="raw")
moved = app.Table("moved", default=int, partitions=2)


@app.agent(source)
async def relay(stream):
    async for event in stream.events():
        moved[event.key] += 1
        await target.send(key=event.key, value=event.value)
