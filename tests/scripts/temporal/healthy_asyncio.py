"""A healthy asyncio TCP echo service under load: 20 client tasks keep
sending over loopback; every handler awaits (no blocking call)."""
import asyncio


async def handle(reader, writer):
    while True:
        data = await reader.readline()
        if not data:
            break
        await asyncio.sleep(0.001)  # pretend to await a backend
        writer.write(data)
        await writer.drain()
    writer.close()


async def client(port, i):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    n = 0
    while True:
        writer.write(b"ping %d %d\n" % (i, n))
        await writer.drain()
        await reader.readline()
        n += 1


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    clients = [asyncio.ensure_future(client(port, i)) for i in range(20)]
    print("READY", flush=True)
    await asyncio.gather(*clients)


asyncio.run(main())
