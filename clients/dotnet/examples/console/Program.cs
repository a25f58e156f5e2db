// A console client of Relay: prints every event of one client id until Enter or Ctrl-C.
//
//   RelayConsole <url> <client-id> [--cursor FILE] [--msgpack]
//
// The token comes from the RELAY_TOKEN environment variable (leave it unset for a node
// run with --allow-anonymous). With --cursor the position survives a restart: the next
// run prints only what was published while it was away.

using System;
using System.Threading;
using System.Threading.Tasks;
using Relay.Client;

namespace RelayConsole
{
    internal static class Program
    {
        private static readonly object Out = new object();

        public static int Main(string[] args)
        {
            if (args.Length < 2)
            {
                Console.Error.WriteLine("usage: RelayConsole <url> <client-id> [--cursor FILE] [--msgpack]");
                return 2;
            }
            var options = new RelayClientOptions
            {
                Url = args[0],
                ClientId = args[1],
                Log = (level, text) =>
                {
                    if (level >= RelayLogLevel.Warning)
                        Console.Error.WriteLine(level + " " + text);
                },
            };
            for (int i = 2; i < args.Length; i++)
            {
                if (args[i] == "--cursor" && i + 1 < args.Length)
                    options.CursorStore = new FileCursorStore(args[++i]);
                else if (args[i] == "--msgpack")
                    options.Format = RelayFormat.MessagePack;
            }
            string token = Environment.GetEnvironmentVariable("RELAY_TOKEN");
            if (!string.IsNullOrEmpty(token))
            {
                // A real app asks its backend for a fresh token here; it is called before
                // every connect, and again after the server says 4500 (token expired).
                options.TokenProvider = cancel => Task.FromResult(token);
            }

            using (var client = new RelayClient(options))
            {
                client.Connected += (sender, e) => Print(
                    "connected node=" + e.Node + " recovered=" + (e.Recovered.HasValue ? e.Recovered.Value.ToString().ToLowerInvariant() : "none")
                    + " replayed=" + e.Replayed + " last_id=" + e.LastId);
                client.MessageReceived += (sender, e) => Print("message " + e.Id + " " + e.Event + " " + e.DataJson);
                client.Disconnected += (sender, e) => Print(
                    "disconnected code=" + e.Code + " reason=" + e.Reason + " reconnect=" + e.WillReconnect.ToString().ToLowerInvariant());

                var stop = new ManualResetEventSlim(false);
                Console.CancelKeyPress += (sender, e) =>
                {
                    e.Cancel = true;
                    stop.Set();
                };
                new Thread(() =>
                {
                    Console.In.ReadLine(); // Enter, or the end of input
                    stop.Set();
                }) { IsBackground = true }.Start();
                client.Completion.ContinueWith(t => stop.Set());

                client.Start();
                stop.Wait();
                client.StopAsync().Wait();
                var closed = client.Completion.Exception == null ? null : client.Completion.Exception.InnerException as RelayClosedException;
                if (closed != null)
                    Print("stopped by the server: " + closed.Code + " " + closed.Reason);
                else
                    Print("stopped last_id=" + client.LastId);
                // Not `return`: Mono now and then hangs in its shutdown after using
                // ClientWebSocket; Environment.Exit does not.
                Environment.Exit(closed != null ? 1 : 0);
                return 0;
            }
        }

        private static void Print(string line)
        {
            lock (Out)
            {
                Console.Out.WriteLine(line);
                Console.Out.Flush();
            }
        }
    }
}
