// The test driver of Relay.Client: tests/clients/test_dotnet.py runs it and asserts on
// what it prints. One JSON object per line on stdout; the client's log on stderr.
//
//   RelayDriver.exe run --url ws://… --client-id ID [--format json|msgpack] [--cursor FILE]
//                       [--context] [--tokens] [--heartbeat S] [--backoff-base S]
//                       [--backoff-max S] [--connect-timeout S] [--no-ack] [--handler-ms N]
//       stdin:  "token <jwt>" (answers a token_request), "status", "stop" (StopAsync, exit 0);
//               end of input stops too.
//       stdout: started, token_request, connected, message, disconnected, completed, status,
//               stopped. Every event line says whether its handler ran on the
//               SynchronizationContext captured by Start() ("on_context").
//   RelayDriver.exe selftest       pure checks without sockets: "ok NAME" / "FAIL NAME: why"
//   RelayDriver.exe decode         stdin lines "json <frame>" / "msgpack <hex>" → the frame as decoded

using System;
using System.Collections.Concurrent;
using System.Collections.Generic;
using System.Globalization;
using System.Runtime.InteropServices;
using System.Threading;
using System.Threading.Tasks;
using Newtonsoft.Json;
using Newtonsoft.Json.Linq;
using Relay.Client;

namespace RelayDriver
{
    internal static class Program
    {
        private static readonly object OutLock = new object();

        public static int Main(string[] args)
        {
            if (args.Length == 0)
            {
                Console.Error.WriteLine("usage: RelayDriver.exe run|selftest|decode …");
                return 2;
            }
            switch (args[0])
            {
                case "selftest":
                    return SelfTest.Run();
                case "decode":
                    return DecodeLines();
                case "run":
                    return new Runner(Options(args)).Run();
                default:
                    Console.Error.WriteLine("unknown mode " + args[0]);
                    return 2;
            }
        }

        public static void Emit(JObject line)
        {
            line["t"] = (DateTime.UtcNow - new DateTime(1970, 1, 1, 0, 0, 0, DateTimeKind.Utc)).TotalSeconds;
            string text = line.ToString(Formatting.None);
            lock (OutLock)
            {
                Console.Out.WriteLine(text);
                Console.Out.Flush();
            }
        }

        private static Dictionary<string, string> Options(string[] args)
        {
            var options = new Dictionary<string, string>();
            for (int i = 1; i < args.Length; i++)
            {
                string name = args[i];
                bool flag = name == "--context" || name == "--tokens" || name == "--no-ack";
                options[name] = flag ? "1" : args[++i];
            }
            return options;
        }

        /// <summary>Frames in, the decoded fields out: the codec checked against Python's encoders.</summary>
        private static int DecodeLines()
        {
            string line;
            while ((line = Console.In.ReadLine()) != null)
            {
                int space = line.IndexOf(' ');
                string kind = line.Substring(0, space), body = line.Substring(space + 1);
                var result = new JObject();
                try
                {
                    ServerFrame frame;
                    if (kind == "json")
                    {
                        frame = ServerFrame.FromJson(body);
                    }
                    else
                    {
                        var bytes = new byte[body.Length / 2];
                        for (int k = 0; k < bytes.Length; k++)
                            bytes[k] = byte.Parse(body.Substring(2 * k, 2), NumberStyles.HexNumber, CultureInfo.InvariantCulture);
                        frame = ServerFrame.FromMessagePack(bytes, bytes.Length);
                    }
                    result["type"] = frame.Type;
                    result["id"] = frame.Id;
                    result["event"] = frame.Event;
                    result["data_json"] = frame.DataJson;
                    result["ts"] = frame.Ts;
                    result["recovered"] = frame.Recovered.HasValue ? new JValue(frame.Recovered.Value) : JValue.CreateNull();
                    result["replayed"] = frame.Replayed;
                    result["last_id"] = frame.LastId;
                }
                catch (Exception ex)
                {
                    result["error"] = ex.GetType().Name + ": " + ex.Message;
                }
                Console.Out.WriteLine(result.ToString(Formatting.None));
            }
            Console.Out.Flush();
            return 0;
        }
    }

    /// <summary>One client under test, commanded through stdin.</summary>
    internal sealed class Runner
    {
        private readonly Dictionary<string, string> _args;
        private readonly BlockingCollection<string> _tokens = new BlockingCollection<string>();
        private readonly ManualResetEventSlim _exit = new ManualResetEventSlim(false);
        private PumpContext _context;
        private RelayClient _client;
        private int _tokenRequests;

        public Runner(Dictionary<string, string> args)
        {
            _args = args;
        }

        private string Arg(string name, string fallback)
        {
            string value;
            return _args.TryGetValue(name, out value) ? value : fallback;
        }

        private TimeSpan Seconds(string name, double fallback)
        {
            return TimeSpan.FromSeconds(double.Parse(Arg(name, fallback.ToString(CultureInfo.InvariantCulture)), CultureInfo.InvariantCulture));
        }

        public int Run()
        {
            var options = new RelayClientOptions
            {
                Url = Arg("--url", null),
                ClientId = Arg("--client-id", null),
                Format = Arg("--format", "json") == "msgpack" ? RelayFormat.MessagePack : RelayFormat.Json,
                BackoffBase = Seconds("--backoff-base", 0.5),
                BackoffMax = Seconds("--backoff-max", 30),
                ConnectTimeout = Seconds("--connect-timeout", 10),
                Heartbeat = Seconds("--heartbeat", 15),
                AutoAck = !_args.ContainsKey("--no-ack"),
                Log = (level, text) => Console.Error.WriteLine(level + " " + text),
            };
            string cursor = Arg("--cursor", null);
            if (cursor != null)
                options.CursorStore = new FileCursorStore(cursor);
            if (_args.ContainsKey("--tokens"))
                options.TokenProvider = AskToken;
            _client = new RelayClient(options);
            _client.Connected += (sender, e) => Program.Emit(new JObject
            {
                { "ev", "connected" },
                { "recovered", e.Recovered.HasValue ? new JValue(e.Recovered.Value) : JValue.CreateNull() },
                { "replayed", e.Replayed },
                { "last_id", e.LastId },
                { "node", e.Node },
                { "on_context", OnContext() },
            });
            int handlerMs = int.Parse(Arg("--handler-ms", "0"), CultureInfo.InvariantCulture);
            _client.MessageReceived += (sender, e) =>
            {
                Program.Emit(new JObject
                {
                    { "ev", "message" },
                    { "id", e.Id },
                    { "biz_id", e.BizId },
                    { "event", e.Event },
                    { "data_json", e.DataJson },
                    { "data", e.DataToken() },
                    { "on_context", OnContext() },
                });
                if (handlerMs > 0)
                    Thread.Sleep(handlerMs); // the app still busy with it after it was printed
            };
            _client.Disconnected += (sender, e) => Program.Emit(new JObject
            {
                { "ev", "disconnected" },
                { "code", e.Code },
                { "reason", e.Reason },
                { "will_reconnect", e.WillReconnect },
                { "delay", e.ReconnectDelay.TotalSeconds },
                { "on_context", OnContext() },
            });
            _client.Completion.ContinueWith(t =>
            {
                var closed = t.Exception == null ? null : t.Exception.InnerException as RelayClosedException;
                Program.Emit(new JObject
                {
                    { "ev", "completed" },
                    { "code", closed == null ? JValue.CreateNull() : new JValue(closed.Code) },
                    { "reason", closed == null ? JValue.CreateNull() : new JValue(closed.Reason) },
                });
            }, TaskScheduler.Default);

            if (_args.ContainsKey("--context"))
            {
                _context = new PumpContext();
                _context.Post(state => _client.Start(), null);
            }
            else
            {
                _client.Start();
            }
            Program.Emit(new JObject { { "ev", "started" } });
            var reader = new Thread(ReadCommands) { IsBackground = true, Name = "stdin" };
            reader.Start();
            _exit.Wait();
            Console.Out.Flush();
            Console.Error.Flush();
            // Mono 6.8 now and then hangs in its shutdown after ClientWebSocket was used (3 of
            // 350 runs of a ten-line program that only connects and closes), and
            // Environment.Exit still runs that shutdown (finalizers, thread suspension): seconds
            // on a loaded machine. The driver has nothing left to clean up (StopAsync returned,
            // its output is flushed), so it leaves the way a killed process does.
            if (Environment.OSVersion.Platform == PlatformID.Unix)
                ExitNow(0);
            Environment.Exit(0);
            return 0;
        }

        [DllImport("libc", EntryPoint = "_exit")]
        private static extern void ExitNow(int code);

        private bool OnContext()
        {
            return _context != null && _context.IsCurrent;
        }

        private async Task<string> AskToken(CancellationToken cancel)
        {
            int n = Interlocked.Increment(ref _tokenRequests);
            Program.Emit(new JObject { { "ev", "token_request" }, { "n", n } });
            return await Task.Run(() => _tokens.Take(cancel), cancel).ConfigureAwait(false);
        }

        private void ReadCommands()
        {
            string line;
            while ((line = Console.In.ReadLine()) != null)
            {
                if (line.StartsWith("token ", StringComparison.Ordinal))
                {
                    _tokens.Add(line.Substring(6));
                }
                else if (line == "status")
                {
                    Program.Emit(new JObject
                    {
                        { "ev", "status" },
                        { "connects", _client.Connects },
                        { "connected", _client.IsConnected },
                        { "duplicates", _client.Duplicates },
                        { "last_id", _client.LastId },
                        { "token_requests", Volatile.Read(ref _tokenRequests) },
                    });
                }
                else if (line == "stop")
                {
                    break;
                }
            }
            _client.StopAsync().Wait();
            Program.Emit(new JObject { { "ev", "stopped" }, { "last_id", _client.LastId } });
            _exit.Set();
        }
    }

    /// <summary>A UI-thread stand-in: one thread runs every posted callback in order.</summary>
    internal sealed class PumpContext : SynchronizationContext
    {
        private readonly BlockingCollection<KeyValuePair<SendOrPostCallback, object>> _queue =
            new BlockingCollection<KeyValuePair<SendOrPostCallback, object>>();
        private readonly Thread _thread;

        public PumpContext()
        {
            _thread = new Thread(Pump) { IsBackground = true, Name = "pump" };
            _thread.Start();
        }

        public bool IsCurrent
        {
            get { return Thread.CurrentThread == _thread && Current == this; }
        }

        public override void Post(SendOrPostCallback d, object state)
        {
            _queue.Add(new KeyValuePair<SendOrPostCallback, object>(d, state));
        }

        public override void Send(SendOrPostCallback d, object state)
        {
            throw new NotSupportedException("the client must not block on the UI thread");
        }

        public override SynchronizationContext CreateCopy()
        {
            return this;
        }

        private void Pump()
        {
            SetSynchronizationContext(this);
            foreach (var item in _queue.GetConsumingEnumerable())
                item.Key(item.Value);
        }
    }
}
