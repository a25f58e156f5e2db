using System;
using System.Collections.Generic;
using System.IO;
using System.Linq;
using Relay.Client;

namespace RelayDriver
{
    /// <summary>
    /// The client's pure parts, without sockets: id order, the close-code table, backoff
    /// bounds, the handshake address, the JSON member scanner, the MessagePack codec and
    /// the cursor file. Prints "ok NAME" or "FAIL NAME: why" per check; exit 1 on a failure.
    /// </summary>
    internal static class SelfTest
    {
        private static int _failures;

        public static int Run()
        {
            Check("stream_ids_compare_as_integer_pairs", StreamIdsCompareAsIntegerPairs);
            Check("stream_id_parse_accepts_only_ms_dash_seq", StreamIdParse);
            Check("close_codes_follow_the_table", CloseCodesFollowTheTable);
            Check("backoff_is_full_jitter_under_the_cap", BackoffIsFullJitter);
            Check("connect_url_adds_path_since_attempt_token", ConnectUrlBuilds);
            Check("client_id_validation", ClientIdValidation);
            Check("json_frame_keeps_data_raw", JsonFrameKeepsDataRaw);
            Check("json_frame_rejects_broken_text", JsonFrameRejectsBrokenText);
            Check("msgpack_decodes_every_type", MessagePackDecodesEveryType);
            Check("msgpack_rejects_truncated_input", MessagePackRejectsTruncated);
            Check("msgpack_client_frames_round_trip", MessagePackClientFrames);
            Check("file_cursor_store_replaces_atomically", FileCursorStoreWorks);
            Console.Out.Flush();
            return _failures == 0 ? 0 : 1;
        }

        private static void Check(string name, Action test)
        {
            try
            {
                test();
                Console.Out.WriteLine("ok " + name);
            }
            catch (Exception ex)
            {
                _failures++;
                Console.Out.WriteLine("FAIL " + name + ": " + ex.Message.Replace("\n", " | "));
            }
        }

        private static void Equal<T>(T want, T got, string what)
        {
            if (!EqualityComparer<T>.Default.Equals(want, got))
                throw new Exception(what + ": want <" + want + "> got <" + got + ">");
        }

        private static void True(bool condition, string what)
        {
            if (!condition)
                throw new Exception(what);
        }

        private static void Throws<TException>(Action action, string what) where TException : Exception
        {
            try
            {
                action();
            }
            catch (TException)
            {
                return;
            }
            throw new Exception(what + ": no " + typeof(TException).Name);
        }

        private static void StreamIdsCompareAsIntegerPairs()
        {
            True(StreamId.Parse("9-0") < StreamId.Parse("10-0"), "9-0 < 10-0");
            True(StreamId.Parse("10-0") < StreamId.Parse("10-1"), "10-0 < 10-1");
            True(StreamId.Parse("10-9") < StreamId.Parse("10-10"), "10-9 < 10-10");
            True(StreamId.Parse("1732612345678-0") > Stream("999999999999-99"), "ms first");
            True(StreamId.Parse("5") == StreamId.Parse("5-0"), "bare ms means ms-0");
            True(StreamId.Parse("7-3") <= StreamId.Parse("7-3"), "<= itself");
            Equal("18446744073709551615-18446744073709551615",
                  StreamId.Parse("18446744073709551615-18446744073709551615").ToString(), "largest id");
            var sorted = new[] { "10-0", "9-5", "100-0", "9-10" }.Select(StreamId.Parse).OrderBy(x => x).Select(x => x.ToString());
            Equal("9-5 9-10 10-0 100-0", string.Join(" ", sorted), "sorted");
        }

        private static StreamId Stream(string text)
        {
            return StreamId.Parse(text);
        }

        private static void StreamIdParse()
        {
            foreach (var bad in new[] { null, "", "-", "-1", "1-", "a-1", "1-b", "1-2-3", " 1-2", "1-2 ", "+1-2",
                                        "123456789012345678901-0", "18446744073709551616-0", "1-18446744073709551616" })
            {
                StreamId id;
                True(!StreamId.TryParse(bad, out id), "accepted <" + bad + ">");
            }
            Throws<FormatException>(() => StreamId.Parse("x"), "Parse(x)");
        }

        private static void CloseCodesFollowTheTable()
        {
            var table = new Dictionary<int, ReconnectAction>
            {
                { 1000, ReconnectAction.Backoff }, { 1001, ReconnectAction.Backoff }, { 1002, ReconnectAction.Backoff },
                { 1006, ReconnectAction.Backoff }, { 1008, ReconnectAction.LongBackoff }, { 1009, ReconnectAction.Backoff },
                { 1011, ReconnectAction.Backoff }, { 1012, ReconnectAction.AtOnce }, { 1013, ReconnectAction.Backoff },
                { 4000, ReconnectAction.Stop }, { 4003, ReconnectAction.Stop }, { 4100, ReconnectAction.Stop },
                { 4499, ReconnectAction.Stop }, { 4501, ReconnectAction.AtOnce }, { 4508, ReconnectAction.AtOnce },
                { 4509, ReconnectAction.AtOnce }, { 4999, ReconnectAction.AtOnce }, { 5000, ReconnectAction.Backoff },
            };
            foreach (var row in table)
            {
                Equal(row.Value, ReconnectPolicy.Plan(row.Key, true, false), "code " + row.Key);
                Equal(row.Value, ReconnectPolicy.Plan(row.Key, false, false), "code " + row.Key + " without a token provider");
            }
            Equal(ReconnectAction.AtOnce, ReconnectPolicy.Plan(4500, true, false), "4500 with a provider");
            Equal(ReconnectAction.Stop, ReconnectPolicy.Plan(4500, false, false), "4500 without a provider");
            Equal(ReconnectAction.Backoff, ReconnectPolicy.Plan(4001, true, false), "first 4001 with a provider");
            Equal(ReconnectAction.Stop, ReconnectPolicy.Plan(4001, true, true), "4001 after a fresh token");
            Equal(ReconnectAction.Stop, ReconnectPolicy.Plan(4001, false, false), "4001 without a provider");
        }

        private static void BackoffIsFullJitter()
        {
            var rng = new Random(7);
            TimeSpan b = TimeSpan.FromSeconds(0.5), cap = TimeSpan.FromSeconds(30), jitter = TimeSpan.FromSeconds(0.25);
            var samples = new Dictionary<string, List<double>>();
            for (int k = 0; k < 2000; k++)
            {
                Add(samples, "atonce0", ReconnectPolicy.Delay(ReconnectAction.AtOnce, 0, b, cap, jitter, rng));
                Add(samples, "atonce3", ReconnectPolicy.Delay(ReconnectAction.AtOnce, 3, b, cap, jitter, rng));
                Add(samples, "backoff0", ReconnectPolicy.Delay(ReconnectAction.Backoff, 0, b, cap, jitter, rng));
                Add(samples, "backoff2", ReconnectPolicy.Delay(ReconnectAction.Backoff, 2, b, cap, jitter, rng));
                Add(samples, "backoff99", ReconnectPolicy.Delay(ReconnectAction.Backoff, 99, b, cap, jitter, rng));
                Add(samples, "long", ReconnectPolicy.Delay(ReconnectAction.LongBackoff, 0, b, cap, jitter, rng));
            }
            Within(samples["atonce0"], 0, 0.25);
            Within(samples["atonce3"], 0, 4.0); // a node that keeps refusing: ordinary backoff
            Within(samples["backoff0"], 0, 0.5);
            Within(samples["backoff2"], 0, 2.0);
            Within(samples["backoff99"], 0, 30.0);
            Within(samples["long"], 15.0, 30.0);
        }

        private static void Add(Dictionary<string, List<double>> samples, string name, TimeSpan delay)
        {
            if (!samples.ContainsKey(name))
                samples[name] = new List<double>();
            samples[name].Add(delay.TotalSeconds);
        }

        /// <summary>All within [low, high], and spread over it (full jitter, not a fixed wait).</summary>
        private static void Within(List<double> values, double low, double high)
        {
            double span = high - low;
            True(values.Min() >= low && values.Max() <= high, "outside [" + low + ", " + high + "]: " + values.Min() + ".." + values.Max());
            True(values.Min() < low + span * 0.05 && values.Max() > high - span * 0.05, "not spread over [" + low + ", " + high + "]");
        }

        private static void ConnectUrlBuilds()
        {
            Equal("ws://h:81/ws/cml?attempt=abc.1",
                  ConnectUrl.Build("ws://h:81", "cml", null, "abc.1", null).AbsoluteUri, "plain");
            Equal("ws://h:81/ws/cml?since=9-0&attempt=abc.2",
                  ConnectUrl.Build("ws://h:81/", "cml", "9-0", "abc.2", null).AbsoluteUri, "since");
            Equal("wss://lb.example/relay/ws/a@b?x=1&since=1-2&attempt=i.3&token=t%2F%2B%3D",
                  ConnectUrl.Build("wss://lb.example/relay/ws/a@b?x=1", "a@b", "1-2", "i.3", "t/+=").AbsoluteUri, "full address");
        }

        private static void ClientIdValidation()
        {
            True(ConnectUrl.IsValidClientId("cml"), "cml");
            True(ConnectUrl.IsValidClientId("A-z_0.9:x@y"), "all classes");
            True(ConnectUrl.IsValidClientId(new string('x', 128)), "128 chars");
            foreach (var bad in new[] { null, "", new string('x', 129), "a b", "a/b", "é", "a?b" })
                True(!ConnectUrl.IsValidClientId(bad), "accepted <" + bad + ">");
            Throws<ArgumentException>(() => new RelayClient(new RelayClientOptions { Url = "ws://h", ClientId = "a b" }), "bad client id");
            Throws<ArgumentException>(() => new RelayClient(new RelayClientOptions { Url = "http://h", ClientId = "a" }), "http url");
        }

        private static void JsonFrameKeepsDataRaw()
        {
            string data = "{\"s\":\"a}b]c\\\"d\\\\\",\"n\":[1,2.50,{\"x\":null}],\"big\":123456789012345678901234567890,"
                          + "\"when\":\"2024-01-02T03:04:05Z\",\"u\":\"\\u00e9\"}";
            string text = " { \"type\" : \"message\", \"id\":\"10-2\",\"biz_id\":\"cml\",\"event\":\"label.\\u0063reated\",\"data\": "
                          + data + " ,\"ts\":1732612345.678,\"extra\":[{\"}\":1}] } ";
            var frame = ServerFrame.FromJson(text);
            Equal("message", frame.Type, "type");
            Equal("10-2", frame.Id, "id");
            Equal("label.created", frame.Event, "escaped event");
            Equal(data, frame.DataJson, "data kept byte for byte");
            Equal(1732612345.678, frame.Ts, "ts");
            var welcome = ServerFrame.FromJson("{\"type\":\"welcome\",\"recovered\":false,\"replayed\":3,\"last_id\":\"5-0\"}");
            Equal(false, welcome.Recovered.Value, "recovered");
            Equal(3L, welcome.Replayed, "replayed");
            Equal("5-0", welcome.LastId, "last_id");
            Equal("null", ServerFrame.FromJson("{\"type\":\"message\"}").DataJson, "absent data");
            Equal(false, ServerFrame.FromJson("{\"type\":\"welcome\"}").Recovered.HasValue, "absent recovered");
        }

        private static void JsonFrameRejectsBrokenText()
        {
            foreach (var bad in new[] { "", "[]", "{", "{\"a\":}", "{\"a\":\"x}", "{\"a\" 1}", "{\"a\":1} x", "{\"a\":[1,2}" })
                Throws<FormatException>(() => ServerFrame.FromJson(bad), "accepted <" + bad + ">");
        }

        private static byte[] Hex(string hex)
        {
            hex = hex.Replace(" ", "");
            var bytes = new byte[hex.Length / 2];
            for (int k = 0; k < bytes.Length; k++)
                bytes[k] = Convert.ToByte(hex.Substring(2 * k, 2), 16);
            return bytes;
        }

        private static void MessagePackDecodesEveryType()
        {
            var cases = new Dictionary<string, string>
            {
                { "c0", "null" }, { "c2", "false" }, { "c3", "true" },
                { "00", "0" }, { "7f", "127" }, { "ff", "-1" }, { "e0", "-32" },
                { "cc ff", "255" }, { "cd ff ff", "65535" }, { "ce ff ff ff ff", "4294967295" },
                { "cf ff ff ff ff ff ff ff ff", "18446744073709551615" },
                { "d0 80", "-128" }, { "d1 80 00", "-32768" }, { "d2 80 00 00 00", "-2147483648" },
                { "d3 80 00 00 00 00 00 00 00", "-9223372036854775808" },
                { "ca 3f c0 00 00", "1.5" }, { "cb 3f f0 00 00 00 00 00 00", "1.0" },
                { "cb 3f b9 99 99 99 99 99 9a", "0.1" },
                { "a3 61 62 63", "\"abc\"" }, { "d9 02 c3 a9", "\"\u00e9\"" }, { "da 00 01 22", "\"\\\"\"" },
                { "c4 03 01 02 03", "\"AQID\"" },
                { "93 01 a1 78 c0", "[1,\"x\",null]" }, { "dc 00 02 c2 c3", "[false,true]" },
                { "82 a1 61 01 a1 62 91 02", "{\"a\":1,\"b\":[2]}" }, { "81 01 a1 76", "{\"1\":\"v\"}" },
                { "de 00 01 a1 6b 80", "{\"k\":{}}" }, { "90", "[]" },
            };
            foreach (var row in cases)
                Equal(row.Value, MessagePack.ToJson(MessagePack.Decode(Hex(row.Key))), "0x" + row.Key);
        }

        private static void MessagePackRejectsTruncated()
        {
            foreach (var bad in new[] { "", "cd ff", "a3 61 62", "92 01", "82 a1 61 01", "c1", "dd ff ff ff ff", "01 02" })
                Throws<FormatException>(() => MessagePack.Decode(Hex(bad)), "accepted 0x" + bad);
        }

        private static void MessagePackClientFrames()
        {
            var pairs = new[]
            {
                new KeyValuePair<string, string>("type", "ack"),
                new KeyValuePair<string, string>("id", "1732612345678-12"),
                new KeyValuePair<string, string>("long", new string('y', 300)),
            };
            var decoded = (Dictionary<string, object>)MessagePack.Decode(MessagePack.EncodeStringMap(pairs));
            Equal("ack", (string)decoded["type"], "type");
            Equal("1732612345678-12", (string)decoded["id"], "id");
            Equal(300, ((string)decoded["long"]).Length, "str16");
        }

        private static void FileCursorStoreWorks()
        {
            string dir = Path.Combine(Path.GetTempPath(), "relay-cursor-" + Guid.NewGuid().ToString("N"));
            try
            {
                var store = new FileCursorStore(Path.Combine(dir, "sub", "cursor"));
                Equal<string>(null, store.Load(), "missing file");
                store.Save("9-0");
                Equal("9-0", store.Load(), "first save");
                store.Save("10-3");
                Equal("10-3", store.Load(), "replaced");
                True(!File.Exists(store.FilePath + ".tmp"), "temp file left behind");
                File.WriteAllText(store.FilePath, "garbage");
                Equal<string>(null, store.Load(), "garbage reads as no cursor");
            }
            finally
            {
                if (Directory.Exists(dir))
                    Directory.Delete(dir, true);
            }
        }
    }
}
