using System;
using System.IO;
using System.Text;

namespace Relay.Client
{
    /// <summary>
    /// Keeps the client's position — the id of the last message whose handler returned —
    /// so a restarted app resumes where it stopped. Called from the client's own thread,
    /// one call at a time.
    /// </summary>
    public interface ICursorStore
    {
        /// <summary>The saved id, or null when there is none.</summary>
        string Load();

        /// <summary>Remember <paramref name="lastId"/>; called after each handled message.</summary>
        void Save(string lastId);
    }

    /// <summary>
    /// A cursor in one small file, replaced atomically (written beside it, flushed, then
    /// renamed over it): a crash leaves the old position or the new one, never half of one.
    /// </summary>
    public sealed class FileCursorStore : ICursorStore
    {
        private readonly string _path;
        private readonly bool _flushToDisk;

        /// <param name="path">The file; its directory is created if missing.</param>
        /// <param name="flushToDisk">
        /// Force every write to the disk before the rename (survives a power cut; costs a
        /// disk flush per message). Without it a process crash still never loses the file.
        /// </param>
        public FileCursorStore(string path, bool flushToDisk = false)
        {
            if (string.IsNullOrEmpty(path))
                throw new ArgumentException("a cursor file path is required", "path");
            _path = Path.GetFullPath(path);
            _flushToDisk = flushToDisk;
        }

        /// <summary>The full path of the cursor file.</summary>
        public string FilePath { get { return _path; } }

        public string Load()
        {
            if (!File.Exists(_path))
                return null;
            string text = File.ReadAllText(_path, Encoding.ASCII).Trim();
            StreamId id;
            return StreamId.TryParse(text, out id) ? id.ToString() : null;
        }

        public void Save(string lastId)
        {
            string directory = Path.GetDirectoryName(_path);
            if (!string.IsNullOrEmpty(directory))
                Directory.CreateDirectory(directory);
            string temp = _path + ".tmp";
            byte[] bytes = Encoding.ASCII.GetBytes(lastId + "\n");
            using (var stream = new FileStream(temp, FileMode.Create, FileAccess.Write, FileShare.None))
            {
                stream.Write(bytes, 0, bytes.Length);
                stream.Flush(_flushToDisk);
            }
            if (File.Exists(_path))
                File.Replace(temp, _path, null);
            else
                File.Move(temp, _path);
        }
    }
}
