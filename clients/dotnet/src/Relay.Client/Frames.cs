using System;
using System.Collections.Generic;
using System.Text;

namespace Relay.Client
{
    /// <summary>
    /// One frame from the server, decoded from JSON text or MessagePack, with the fields
    /// the client uses. Unknown types and fields are kept out of the way, not refused:
    /// later protocol versions may add them.
    /// </summary>
    internal sealed class ServerFrame
    {
        public string Type;
        // message
        public string Id;
        public string BizId;
        public string Event;
        public string DataJson;
        public double Ts;
        // welcome
        public string Node;
        public string Session;
        public double? Heartbeat;
        public bool? Recovered;
        public long Replayed;
        public string LastId;
        // error
        public string Code;
        public string Message;

        public static ServerFrame FromJson(string text)
        {
            Dictionary<string, string> m = JsonScan.Members(text);
            string data;
            var frame = new ServerFrame
            {
                Type = JsonScan.String(m, "type"),
                Id = JsonScan.String(m, "id"),
                BizId = JsonScan.String(m, "biz_id"),
                Event = JsonScan.String(m, "event"),
                DataJson = m.TryGetValue("data", out data) ? data : "null",
                Ts = JsonScan.Number(m, "ts") ?? 0.0,
                Node = JsonScan.String(m, "node"),
                Session = JsonScan.String(m, "session"),
                Heartbeat = JsonScan.Number(m, "heartbeat"),
                Recovered = JsonScan.Bool(m, "recovered"),
                Replayed = (long)(JsonScan.Number(m, "replayed") ?? 0.0),
                LastId = JsonScan.String(m, "last_id"),
                Code = JsonScan.String(m, "code"),
                Message = JsonScan.String(m, "message"),
            };
            return frame;
        }

        public static ServerFrame FromMessagePack(byte[] buffer, int count)
        {
            var m = MessagePack.Decode(buffer, count) as Dictionary<string, object>;
            if (m == null)
                throw new FormatException("a frame is a MessagePack map");
            object data;
            var frame = new ServerFrame
            {
                Type = Text(m, "type"),
                Id = Text(m, "id"),
                BizId = Text(m, "biz_id"),
                Event = Text(m, "event"),
                DataJson = MessagePack.ToJson(m.TryGetValue("data", out data) ? data : null),
                Ts = Number(m, "ts") ?? 0.0,
                Node = Text(m, "node"),
                Session = Text(m, "session"),
                Heartbeat = Number(m, "heartbeat"),
                Recovered = Flag(m, "recovered"),
                Replayed = (long)(Number(m, "replayed") ?? 0.0),
                LastId = Text(m, "last_id"),
                Code = Text(m, "code"),
                Message = Text(m, "message"),
            };
            return frame;
        }

        private static string Text(Dictionary<string, object> m, string name)
        {
            object value;
            return m.TryGetValue(name, out value) ? value as string : null;
        }

        private static bool? Flag(Dictionary<string, object> m, string name)
        {
            object value;
            return m.TryGetValue(name, out value) && value is bool ? (bool?)(bool)value : null;
        }

        private static double? Number(Dictionary<string, object> m, string name)
        {
            object value;
            if (!m.TryGetValue(name, out value) || value == null)
                return null;
            if (value is double)
                return (double)value;
            if (value is long)
                return (long)value;
            if (value is ulong)
                return (ulong)value;
            return null;
        }
    }

    /// <summary>The client's own frames: <c>ping</c> and <c>ack</c>.</summary>
    internal static class ClientFrames
    {
        public static byte[] Ping(RelayFormat format)
        {
            return Encode(format, new[] { new KeyValuePair<string, string>("type", "ping") });
        }

        public static byte[] Ack(RelayFormat format, StreamId id)
        {
            return Encode(format, new[]
            {
                new KeyValuePair<string, string>("type", "ack"),
                new KeyValuePair<string, string>("id", id.ToString()),
            });
        }

        private static byte[] Encode(RelayFormat format, KeyValuePair<string, string>[] pairs)
        {
            if (format == RelayFormat.MessagePack)
                return MessagePack.EncodeStringMap(pairs);
            var sb = new StringBuilder("{");
            for (int k = 0; k < pairs.Length; k++)
            {
                if (k > 0)
                    sb.Append(',');
                sb.Append(JsonScan.Quote(pairs[k].Key)).Append(':').Append(JsonScan.Quote(pairs[k].Value));
            }
            sb.Append('}');
            return Encoding.UTF8.GetBytes(sb.ToString());
        }
    }
}
