"""The naive reference design the benchmarks compare Parley with: one Python process
with a WebSocket server and a Kafka client doing the same job, the way the seed articles
build it. JSON on the wire (no schema registry), no transactions, auto-committed offsets,
no idempotence, no projection, no retries.

A question arrives on the WebSocket, is produced to `<prefix>naive-queries`, acknowledged
once Kafka has it; a consumer thread asks the LLM and produces the answer to
`<prefix>naive-answers`; another consumer thread pushes answers to the asking socket.
It speaks the subset of Parley's protocol the latency benchmark uses (ready, query → ack,
answer with llm_latency_ms), so the same client drives both.

    python naive_chat.py --port 8099 --brokers 127.0.0.1:19092 --llm http://127.0.0.1:18080/v1
"""

import argparse
import asyncio
import json
import threading
import time
import uuid

import websockets
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--llm", required=True)
    parser.add_argument("--topic-prefix", default="")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    queries, answers = f"{args.topic_prefix}naive-queries", f"{args.topic_prefix}naive-answers"
    admin = AdminClient({"bootstrap.servers": args.brokers})
    for future in admin.create_topics([NewTopic(t, 1, 1) for t in (queries, answers)]).values():
        try:
            future.result()
        except Exception as error:  # already there from an earlier run
            print(f"topic: {error}", flush=True)
    asyncio.run(serve(args, queries, answers))


async def serve(args, queries: str, answers: str) -> None:
    loop = asyncio.get_running_loop()
    producer = Producer({"bootstrap.servers": args.brokers, "linger.ms": 2})
    sockets = {}

    def delivery_pump() -> None:
        while True:
            producer.poll(0.05)

    def produce(topic: str, key: str, value: dict) -> asyncio.Future:
        done = loop.create_future()

        def report(error, _message) -> None:
            if error:
                loop.call_soon_threadsafe(done.set_exception, KafkaException(error))
            else:
                loop.call_soon_threadsafe(done.set_result, None)

        producer.produce(topic, key=key, value=json.dumps(value), on_delivery=report)
        return done

    def answer_queries() -> None:
        llm = OpenAI(base_url=args.llm, api_key="none")
        consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": f"{queries}-llm",
                             "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
        consumer.subscribe([queries])
        while True:
            message = consumer.poll(0.1)
            if message is None or message.error():
                continue
            query = json.loads(message.value())
            started = time.monotonic()
            completion = llm.chat.completions.create(
                model="model", max_tokens=args.max_tokens,
                messages=[{"role": "user", "content": query["text"]}])
            llm_ms = (time.monotonic() - started) * 1000
            answer = {"type": "answer", "conversation_id": query["conversation_id"],
                      "socket": query["socket"], "text": completion.choices[0].message.content,
                      "llm_latency_ms": round(llm_ms)}
            producer.produce(answers, key=query["conversation_id"], value=json.dumps(answer))

    def push_answers() -> None:
        consumer = Consumer({"bootstrap.servers": args.brokers, "group.id": f"{answers}-ws",
                             "auto.offset.reset": "earliest", "fetch.wait.max.ms": 10})
        consumer.subscribe([answers])
        while True:
            message = consumer.poll(0.1)
            if message is None or message.error():
                continue
            answer = json.loads(message.value())
            socket = sockets.get(answer.pop("socket"))
            if socket is not None:
                asyncio.run_coroutine_threadsafe(socket.send(json.dumps(answer)), loop)

    async def session(socket) -> None:
        socket_id = str(uuid.uuid4())
        sockets[socket_id] = socket
        await socket.send(json.dumps({"type": "ready"}))
        try:
            async for text in socket:
                frame = json.loads(text)
                conversation = frame.get("conversation_id") or str(uuid.uuid4())
                await produce(queries, conversation, {"conversation_id": conversation, "socket": socket_id,
                                                      "text": frame["text"]})
                await socket.send(json.dumps({"type": "ack", "conversation_id": conversation}))
        finally:
            sockets.pop(socket_id, None)

    for work in (delivery_pump, answer_queries, push_answers):
        threading.Thread(target=work, daemon=True).start()
    async with websockets.serve(session, "127.0.0.1", args.port):
        print(f"naive reference listening on 127.0.0.1:{args.port}", flush=True)
        await asyncio.Future()


if __name__ == "__main__":
    main()
