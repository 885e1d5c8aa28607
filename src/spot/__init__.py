"""spot: Tardis Machine market data into PostgreSQL, nothing lost, nothing duplicated.

The path of one message, one module per stage:
  websocket.TardisMachineSource, file_replay  -> Frame (text + receive time)
  data_processor.DataProcessor                -> row tuples (pure; messages.py, tables.py)
  queue_manager.QueueManager                  -> bounded per-ticker queues, batches
  db_writer.QueueProcessor                    -> binary COPY into orderbook_<t> / trade_<t>
  main_loop.run                               wires them and owns shutdown
"""

__version__ = "0.1.0"
